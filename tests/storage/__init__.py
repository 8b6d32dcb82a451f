"""Tests of iota.storage."""
