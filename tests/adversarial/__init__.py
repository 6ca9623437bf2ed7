"""The attack suite: each test plays one adversary (malicious buyer, dishonest seller,
hostile network, interrupting user) through the real daemon and fails when the defence it
targets is removed. docs/threat-model.md maps every finding to its test."""
