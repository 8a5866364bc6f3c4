"""Neuron Atlas builder."""
