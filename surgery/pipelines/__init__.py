"""The conversion and its replay: one function each, taking an options object."""
