"""The fault suite (issue 9, part 10): faults injected into real runs, every source row accounted for."""
