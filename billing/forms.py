"""Forms behind the finance admin's actions. They validate everything a person
can type (no 500 on bad input); the admin then calls one service with the
cleaned data."""

from __future__ import annotations

import re
import secrets
from decimal import Decimal

from django import forms
from django.contrib.admin.widgets import AdminSplitDateTime, ForeignKeyRawIdWidget
from django.utils import timezone

from billing.models import ApiKey, CreditGrant, CreditPack, Customer, Feature, Wallet
from billing.numbers import MAX_CREDITS

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_BULK_CUSTOMERS = 20_000
MIN_CREDITS = Decimal("0.000001")
GRANTABLE_KINDS = [(value, label) for value, label in CreditGrant.Kind.choices
                   if value != CreditGrant.Kind.ADJUSTMENT]


def new_submission_token() -> str:
    return secrets.token_urlsafe(16)


def credits_field(**kwargs) -> forms.DecimalField:
    kwargs.setdefault("min_value", MIN_CREDITS)
    return forms.DecimalField(max_digits=20, decimal_places=6, max_value=MAX_CREDITS, **kwargs)


class SubmissionTokenMixin(forms.Form):
    """A hidden per-render token: the idempotency key of what the form creates,
    so submitting the same page twice creates nothing new."""

    token = forms.CharField(widget=forms.HiddenInput, initial=new_submission_token)

    def clean_token(self) -> str:
        token = self.cleaned_data["token"]
        if not TOKEN_RE.match(token):
            raise forms.ValidationError("This form has expired; reload the page.")
        return token


class WalletChoiceMixin(forms.Form):
    """``wallet`` picked with the admin's raw-id lookup (wallets can be many)."""

    wallet = forms.ModelChoiceField(queryset=Wallet.objects.select_related("customer"))

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            self.fields["wallet"].widget = ForeignKeyRawIdWidget(
                CreditGrant._meta.get_field("wallet").remote_field, admin_site
            )


class GrantCreditsForm(SubmissionTokenMixin, WalletChoiceMixin):
    kind = forms.ChoiceField(choices=GRANTABLE_KINDS, initial=CreditGrant.Kind.PROMOTIONAL)
    amount = credits_field(help_text="Credits to add.")
    effective_at = forms.SplitDateTimeField(
        required=False, widget=AdminSplitDateTime, help_text="Empty: now."
    )
    expires_at = forms.SplitDateTimeField(
        required=False, widget=AdminSplitDateTime, help_text="Empty: never expires. UTC."
    )
    priority = forms.IntegerField(min_value=0, max_value=100, initial=50,
                                  help_text="0–100; lower is consumed first.")
    price_paid = forms.DecimalField(max_digits=20, decimal_places=4, min_value=0, required=False, initial=0,
                                    help_text="Money actually paid (prepaid); 0 for promotional credits.")
    feature = forms.ModelChoiceField(queryset=Feature.objects.filter(active=True), required=False,
                                     help_text="Only usage of this feature may use these credits.")
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}))

    def clean(self):
        data = super().clean()
        price = data.get("price_paid") or Decimal(0)
        data["price_paid"] = price
        if data.get("kind") == CreditGrant.Kind.PROMOTIONAL and price > 0:
            self.add_error("price_paid", "Promotional credits are free: leave the price at 0.")
        effective_at = data.get("effective_at") or timezone.now()
        expires_at = data.get("expires_at")
        if expires_at is not None and expires_at <= effective_at:
            self.add_error("expires_at", "The grant must expire after it takes effect (and in the future).")
        return data


class SellPackForm(SubmissionTokenMixin, WalletChoiceMixin):
    pack = forms.ModelChoiceField(queryset=CreditPack.objects.filter(active=True))
    quantity = forms.IntegerField(min_value=1, max_value=10_000, initial=1)


class AdjustmentRequestForm(WalletChoiceMixin):
    amount = forms.DecimalField(
        max_digits=20, decimal_places=6, min_value=-MAX_CREDITS, max_value=MAX_CREDITS,
        help_text="Positive adds credits; negative removes them in consumption order.",
    )
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}))

    def clean_amount(self) -> Decimal:
        amount = self.cleaned_data["amount"]
        if amount == 0:
            raise forms.ValidationError("An adjustment must change the balance.")
        return amount


class ExtendExpiryForm(forms.Form):
    expires_at = forms.SplitDateTimeField(required=False, widget=AdminSplitDateTime,
                                          help_text="The new expiry, later than the current one. UTC.")
    never_expires = forms.BooleanField(required=False, help_text="Remove the expiry instead.")
    reason = forms.CharField(max_length=500, required=False)

    def clean(self):
        data = super().clean()
        if data.get("never_expires"):
            data["expires_at"] = None
        elif data.get("expires_at") is None:
            if "expires_at" not in self.errors:
                self.add_error("expires_at", "Give the new expiry, or tick “never expires”.")
        elif data["expires_at"] <= timezone.now():
            self.add_error("expires_at", "The new expiry must be in the future.")
        return data


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}))


class OptionalReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, required=False, widget=forms.Textarea(attrs={"rows": 2}))


class BulkPromoForm(SubmissionTokenMixin):
    customer_ids = forms.CharField(required=False, widget=forms.HiddenInput)
    external_ids = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 8, "cols": 60}),
        help_text="Customers' external ids, one per line (added to any selected customers).",
    )
    amount = credits_field(help_text="Promotional credits per customer.")
    days = forms.IntegerField(min_value=1, max_value=3650, initial=30, help_text="They expire after this many days.")
    reason = forms.CharField(max_length=500, help_text="Shown on every grant and ledger entry.")

    def clean_customer_ids(self) -> list[int]:
        raw = self.cleaned_data["customer_ids"].strip()
        if not raw:
            return []
        try:
            ids = sorted({int(part) for part in raw.split(",") if part.strip()})
        except ValueError:
            raise forms.ValidationError("The customer selection is malformed; select the customers again.") from None
        if len(ids) > MAX_BULK_CUSTOMERS or any(i <= 0 for i in ids):
            raise forms.ValidationError(f"Select between 1 and {MAX_BULK_CUSTOMERS} customers.")
        return ids

    def clean_external_ids(self) -> list[str]:
        seen: dict[str, None] = {}
        for line in self.cleaned_data["external_ids"].splitlines():
            value = line.strip()
            if not value:
                continue
            if len(value) > 255:
                raise forms.ValidationError(f"An external id is at most 255 characters: {value[:40]}…")
            seen.setdefault(value, None)
        if len(seen) > MAX_BULK_CUSTOMERS:
            raise forms.ValidationError(f"Paste at most {MAX_BULK_CUSTOMERS} ids at a time.")
        return list(seen)

    def clean(self):
        data = super().clean()
        if not self.errors and not data.get("customer_ids") and not data.get("external_ids"):
            raise forms.ValidationError("Select customers on the customer list or paste their external ids.")
        return data


class CustomerAddForm(forms.ModelForm):
    """A new customer and its default wallet's policy."""

    policy = forms.ChoiceField(choices=Wallet.Policy.choices, initial=Wallet.Policy.BLOCK,
                               help_text="What happens when the default wallet runs short.")
    credit_limit = forms.DecimalField(max_digits=20, decimal_places=6, min_value=0, max_value=MAX_CREDITS,
                                      initial=0, help_text="Overdraft wallets may go this far below zero.")

    class Meta:
        model = Customer
        fields = ["external_id", "name", "email", "currency", "timezone"]


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(choices=ApiKey.Scope.choices, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = ApiKey
        fields = ["name", "scopes"]
