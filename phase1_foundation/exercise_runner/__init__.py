"""Exercises checked against your own code: the course's tests, run on the stubs in `learner/`.

`python -m course_exercises list` shows the exercises; `python -m course_exercises run NAME` runs the
tests of one of them against your code (see the root README, "Exercises").
"""
