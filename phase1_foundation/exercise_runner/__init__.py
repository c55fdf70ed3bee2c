"""Exercises checked against your own code: the course's tests, run on the stubs in each phase's
`exercises/`.

`python -m phase1_foundation.exercise_runner list` shows the exercises;
`python -m phase1_foundation.exercise_runner run NAME` runs the tests of one of them against your code
(see the root README, "Exercises").
"""
