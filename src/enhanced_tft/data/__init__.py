"""Files or generators -> validated bars -> features and targets -> train-fitted scaling -> splits by date ->
window views; and the table of predictions built from the same rows (tables.py).

May import: errors, tasks, config. Data never imports the model; windows are views over arrays it owns.
"""
