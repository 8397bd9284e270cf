"""What people read: terminal text, charts and PNGs, the progress bar."""
