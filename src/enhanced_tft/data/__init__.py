"""Files or generators -> validated bars -> features and targets -> window views."""
