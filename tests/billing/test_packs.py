"""Credit packs: volume-tier pricing, the prepaid grant a purchase creates
(cost basis = price ÷ credits, expiry = validity days), idempotent purchase."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.errors import IdempotencyConflict, InvalidRequest
from billing.models import CreditGrant, CreditPack, LedgerEntry, PackDiscountTier, PackPurchase
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from billing.services.packs import pack_price, pack_purchase
from tests.conftest import assert_ledger_consistent
from tests.factories import CreditPackFactory, make_customer

D = Decimal


@pytest.fixture
def pack(db):
    pack = CreditPackFactory(code="pro", name="Pro", credits=D("700"), price=D("10.00"), validity_days=90,
                             priority=40)
    PackDiscountTier.objects.create(pack=pack, min_quantity=3, discount_percent=D("10"))
    PackDiscountTier.objects.create(pack=pack, min_quantity=10, discount_percent=D("25"))
    return pack


@pytest.fixture
def wallet(db):
    return default_wallet(make_customer("acme"))


@pytest.mark.parametrize(("quantity", "discount", "total"), [
    (1, "0", "10.00"), (2, "0", "20.00"), (3, "10", "27.00"), (9, "10", "81.00"), (10, "25", "75.00"),
    (40, "25", "300.00"),
])
def test_volume_tier_discount(pack, quantity, discount, total):
    list_price, got_discount, got_total = pack_price(pack=pack, quantity=quantity)
    assert (list_price, got_discount, got_total) == (D("10.00") * quantity, D(discount), D(total))


@pytest.mark.django_db
def test_totals_round_half_up_to_the_currency_minor_unit():
    yen = CreditPackFactory(code="yen", credits=D("100"), price=D("333"), currency="JPY")
    PackDiscountTier.objects.create(pack=yen, min_quantity=2, discount_percent=D("12.5"))
    assert pack_price(pack=yen, quantity=3)[2] == D("874")  # 999 × 0.875 = 874.125
    cents = CreditPackFactory(code="cents", credits=D("100"), price=D("0.99"))
    PackDiscountTier.objects.create(pack=cents, min_quantity=2, discount_percent=D("50"))
    assert pack_price(pack=cents, quantity=3)[2] == D("1.49")  # 1.485 -> 1.49, half up


@pytest.mark.django_db
def test_purchase_creates_a_prepaid_grant_at_the_price_paid(pack, wallet):
    before = timezone.now()
    purchase = pack_purchase(wallet=wallet, pack=pack, quantity=3)
    grant = purchase.grant
    assert (purchase.credits, purchase.total_price, purchase.discount_percent) == (D("2100"), D("27.00"), D("10"))
    assert (grant.kind, grant.source, grant.status) == ("prepaid", "pack_purchase", "active")
    assert (grant.original_amount, grant.remaining, grant.price_paid) == (D("2100"), D("2100"), D("27.00"))
    assert grant.per_unit_cost_basis == D("0.0128571429")  # 27 / 2100, 10 places, half up
    assert grant.priority == 40
    assert before + timedelta(days=90) <= grant.expires_at <= timezone.now() + timedelta(days=90)
    assert grant.expires_at - grant.effective_at == timedelta(days=90)
    assert wallet_balance(default_wallet(wallet.customer)).available == D("2100")
    assert LedgerEntry.objects.get(wallet=wallet).amount == D("2100")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_pack_without_validity_never_expires_and_promotional_costs_nothing(wallet):
    forever = CreditPackFactory(code="forever", credits=D("50"), price=D("5.00"), validity_days=None)
    promo = CreditPackFactory(code="welcome", kind=CreditPack.Kind.PROMOTIONAL, credits=D("20"), price=D("0"),
                              validity_days=14)
    assert pack_purchase(wallet=wallet, pack=forever).grant.expires_at is None
    free = pack_purchase(wallet=wallet, pack=promo, quantity=2).grant
    assert (free.kind, free.original_amount, free.per_unit_cost_basis, free.price_paid) == (
        "promotional", D("40"), 0, 0)
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_big_pack_is_paid_for_and_needs_no_approval(wallet, settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    big = CreditPackFactory(code="big", credits=D("100000"), price=D("900.00"))
    assert pack_purchase(wallet=wallet, pack=big).grant.status == CreditGrant.Status.ACTIVE


@pytest.mark.django_db
def test_purchase_awaiting_payment_adds_nothing_yet(pack, wallet):
    purchase = pack_purchase(wallet=wallet, pack=pack, pending_payment=True)
    assert (purchase.grant.status, purchase.grant.remaining) == (CreditGrant.Status.PENDING_PAYMENT, 0)
    assert wallet_balance(default_wallet(wallet.customer)).available == 0
    assert not LedgerEntry.objects.filter(wallet=wallet).exists()
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_purchase_awaiting_approval_is_recorded_and_adds_nothing_until_approved(pack, wallet):
    from billing.services.grants import grant_approve
    from tests.factories import UserFactory

    purchase = pack_purchase(wallet=wallet, pack=pack, quantity=3, require_approval=True,
                             idempotency_key="approve-me", actor_label="auto top-up")
    assert PackPurchase.objects.get(idempotency_key="approve-me") == purchase
    assert (purchase.grant.status, purchase.grant.remaining) == (CreditGrant.Status.PENDING_APPROVAL, 0)
    assert purchase.total_price == D("27.00") and purchase.grant.price_paid == D("27.00")
    assert wallet_balance(default_wallet(wallet.customer)).available == 0

    grant_approve(grant_id=purchase.grant_id, user=UserFactory(is_superuser=True))
    assert wallet_balance(default_wallet(wallet.customer)).available == D("2100")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_inactive_pack_or_no_quantity_is_refused(pack, wallet):
    with pytest.raises(InvalidRequest):
        pack_purchase(wallet=wallet, pack=pack, quantity=0)
    pack.active = False
    pack.save()
    with pytest.raises(InvalidRequest):
        pack_purchase(wallet=wallet, pack=pack)
    assert not PackPurchase.objects.exists()


@pytest.mark.django_db
def test_purchase_idempotency_key_sells_once(pack, wallet):
    first = pack_purchase(wallet=wallet, pack=pack, quantity=2, idempotency_key="order-1")
    again = pack_purchase(wallet=wallet, pack=pack, quantity=2, idempotency_key="order-1")
    assert again.pk == first.pk
    assert PackPurchase.objects.count() == CreditGrant.objects.count() == 1
    assert default_wallet(wallet.customer).ledger_balance == D("1400")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["quantity", "pack", "wallet"])
def test_purchase_key_reused_for_a_different_purchase_is_refused(pack, wallet, change):
    pack_purchase(wallet=wallet, pack=pack, quantity=2, idempotency_key="order-1")
    other_pack = CreditPackFactory(code="other", credits=D("700"), price=D("10.00"))
    kwargs = {"wallet": wallet, "pack": pack, "quantity": 2}
    kwargs |= {"quantity": {"quantity": 3}, "pack": {"pack": other_pack},
               "wallet": {"wallet": default_wallet(make_customer("someone-else"))}}[change]
    with pytest.raises(IdempotencyConflict):
        pack_purchase(idempotency_key="order-1", **kwargs)
    assert PackPurchase.objects.count() == CreditGrant.objects.count() == 1
    assert_ledger_consistent(kwargs["wallet"])
