"""The finance back office: every billing model in the Django admin.

Registration happens on import of the modules below; see ``base`` for the
shared pieces (capped paginator, audit mixin, operations).
"""

from billing.admin import catalog, contracts, customers, grants, invoicing, ledger, revenue, system  # noqa: F401
