"""Weight-file readers and writers: each turns a file format into the canonical (HF) state dict."""
