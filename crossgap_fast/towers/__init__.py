"""The frozen CLIP towers as the inversion sees them: the text template, transformer blocks and
the text and vision forwards with pseudo tokens / pseudo patches put in."""
