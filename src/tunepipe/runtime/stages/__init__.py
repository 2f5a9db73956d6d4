"""One module per stage (`run(ctx) -> metrics`); their versions and needs are in `tunepipe/stage_table.py`."""
