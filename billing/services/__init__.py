"""Services: the only writers of credit and money state (see STYLE.md)."""
