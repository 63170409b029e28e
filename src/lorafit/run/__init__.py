"""Run orchestration: a config built into a run (`build`), run (`runner`), resumed (`resume`), its folder
(`experiment`) and its report (`report`). Import the modules themselves; this package re-exports nothing, so
importing one of them does not pay for the others."""
