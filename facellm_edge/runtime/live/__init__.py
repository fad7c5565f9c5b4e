"""The live camera loop: sources (cameras, files, streams), an IoU tracker, the overlay and the frame loop."""
