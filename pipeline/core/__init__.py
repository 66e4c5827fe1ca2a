"""What every stage shares: the params schema and its reading, the error type and the stage command,
outputs written whole, loading what earlier stages wrote, device and precision."""
