"""Command-line entry points (`hf-taskdistill train`, `hf-taskdistill select`)."""
