"""Probes of trained eqdisp models: why does dispersion help? (Imports go cli -> analysis -> eqdisp.)"""
