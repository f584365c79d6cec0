"""sentiment-batcher: the command line and the settings shared by every process."""
