"""What every other package builds on and nothing of the project's: writing files whole, lazy package exports, the
loss on supervised positions."""
