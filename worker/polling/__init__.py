"""The poll planner: spend each key's poll budget where a change is likeliest.

- model.py: the learned completion-age distribution and its hazard (pure);
- allocation.py: the square-root rule as a plan, next-poll delays, budget and pacing (pure);
- store.py: the planner's Redis keys (plan inputs, plans, learned completions);
- planner.py: the sweeper's side (plan every key, pace its polls);
- timer.py: the track step's side (when is the next poll due).
"""
