"""Sharding plans for the models' embedding tables: constraints, planner, readable plan reports. No Ray."""
