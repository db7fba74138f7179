"""CRM models (accounts' owners, opportunities, approvals) arrive with the CRM issue."""
