"""Where text and models come from (local files, URLs, the Hugging Face Hub) and how records become text."""
