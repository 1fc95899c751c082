"""What is trained on: subject photos and the class images of prior preservation."""
