"""Preference alignment and reward modelling: DPO, SimPO, outcome and process reward models."""
