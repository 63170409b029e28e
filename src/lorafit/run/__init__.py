"""Run orchestration: a config built into a run (`build`), run (`runner`), its folder (`experiment`), its
report (`report`), its datasets as training sees them (`preview`); resuming is lorafit/checkpoint/resume.py (the
training loop restores through it). Import the modules themselves; this package re-exports nothing, so importing
one of them does not pay for the others."""
