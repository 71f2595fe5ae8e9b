"""The built-in procedural audio world of the demo: scenes, their analyser (the judge of eval and
DPO pairs) and the demo data build."""
