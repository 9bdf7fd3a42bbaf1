"""Pipeline steps: each step is one plain function called by DVC, KFP and the tests."""
