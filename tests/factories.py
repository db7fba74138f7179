"""factory_boy factories shared by the suite. Credits move only through services:
``funded_wallet`` and ``grant`` call ``grant_create`` so the ledger stays whole."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CreditPack, Customer, Feature, FeatureCost, Wallet
from billing.services.grants import customer_create, default_wallet, grant_create


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"staff{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", "pw-for-tests-1")


class FeatureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Feature
        django_get_or_create = ("key",)

    key = factory.Sequence(lambda n: f"feature-{n}")
    name = factory.LazyAttribute(lambda f: f.key.replace("-", " ").title())
    unit = "request"


class CreditPackFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = CreditPack
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"pack-{n}")
    name = factory.LazyAttribute(lambda p: p.code.title())
    kind = CreditPack.Kind.PREPAID
    credits = Decimal("1000")
    price = Decimal("100.00")
    validity_days = 365


def make_customer(external_id: str | None = None, **kwargs) -> Customer:
    external_id = external_id or f"cust-{Customer.objects.count() + 1}-{timezone.now().timestamp():.0f}"
    return customer_create(external_id=external_id, name=kwargs.pop("name", external_id.title()), **kwargs)


def make_feature(key: str = "api-call", credits_per_unit: str | Decimal = "1", *, effective_from=None,
                 customer: Customer | None = None) -> Feature:
    feature = FeatureFactory(key=key)
    FeatureCost.objects.create(
        feature=feature, customer=customer, credits_per_unit=Decimal(str(credits_per_unit)),
        effective_from=effective_from or timezone.now() - timedelta(days=400),
    )
    return feature


def grant(wallet: Wallet, amount, kind: str = "prepaid", **kwargs):
    kwargs.setdefault("require_approval", False)
    if kind == "prepaid" and "price_paid" not in kwargs:
        kwargs["price_paid"] = Decimal(str(amount)) / 10
    return grant_create(wallet=wallet, kind=kind, amount=Decimal(str(amount)), **kwargs)


def funded_wallet(amount="100", *, policy: str = Wallet.Policy.BLOCK, credit_limit="0", **grant_kwargs) -> Wallet:
    customer = make_customer(policy=policy, credit_limit=Decimal(credit_limit))
    wallet = default_wallet(customer)
    if Decimal(str(amount)) > 0:
        grant(wallet, amount, **grant_kwargs)
    wallet.refresh_from_db()
    return wallet
