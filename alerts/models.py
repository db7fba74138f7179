"""Alert rules, their state and delivery arrive with the alerts issue (see DESIGN.md §1)."""
