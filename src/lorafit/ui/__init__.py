"""`lorafit ui`: a local web page over the run folders — their status, live loss curves, reports,
stop and resume (app.py serves it; runs.py reads the folders)."""
