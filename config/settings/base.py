"""Settings, read from the environment with safe local defaults.

Every variable is listed in README.md ("Configuration").
"""

import os
from decimal import Decimal
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


# --- Core -------------------------------------------------------------------
SECRET_KEY = env("DJANGO_SECRET_KEY", "dev-insecure-creditdesk-key-change-me-in-production-0123456789")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [h.strip() for h in env("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in env("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "billing",
    "crm",
    "alerts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "billing.api.middleware.ApiErrorEnvelopeMiddleware",  # error envelope for every /api/ response
    # Session, CSRF, auth and messages: not run for /api/ (bearer keys only), see billing/api/middleware.py.
    "billing.api.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "billing.api.middleware.CsrfViewMiddleware",
    "billing.api.middleware.AuthenticationMiddleware",
    "billing.api.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
# PostgreSQL only. DATABASE_URL when set; otherwise the embedded server in .pgdata/.
if not env("DATABASE_URL"):
    from config.embedded_db import ensure_database_url

    ensure_database_url()
DATABASES = {"default": dj_database_url.parse(env("DATABASE_URL"), conn_max_age=int(env("DB_CONN_MAX_AGE", "60")))}
# Off: a health check is one more round trip (SELECT 1) per request on the hot path; a connection
# broken meanwhile fails one request and is then closed by Django (errors_occurred).
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env_bool("DB_CONN_HEALTH_CHECKS", False)
# The usage API's per-request statements run as server-side prepared statements (billing/prepared.py);
# 0 for a pooler that does not keep a session per client (PgBouncer in transaction mode).
DB_PREPARED_STATEMENTS = env_bool("DB_PREPARED_STATEMENTS", True)
DATABASES["default"]["TEST"] = {"NAME": env("DATABASE_TEST_NAME", "test_creditdesk")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static -----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / ".run" / "static"
LOGIN_URL = "admin:login"

# --- Email ------------------------------------------------------------------
EMAIL_BACKEND = env("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", "localhost")
EMAIL_PORT = int(env("EMAIL_PORT", "25"))
EMAIL_HOST_USER = env("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_FILE_PATH = env("EMAIL_FILE_PATH", str(BASE_DIR / ".run" / "mail"))
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "Creditdesk <billing@creditdesk.local>")

# --- REST API ---------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["billing.api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["billing.api.auth.HasScope"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "billing.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "COERCE_DECIMAL_TO_STRING": True,
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Creditdesk API",
    "DESCRIPTION": "Real-time credit charging, balances, grants and reservations.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # Request bodies as their own components: a field that refuses "" says so (minLength: 1).
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI served from our own static files: the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Celery -----------------------------------------------------------------
# A broker that needs no server by default: kombu's filesystem transport, shared
# by every process on this machine through folders under .run/broker/ (or
# CELERY_BROKER_DIR). Every path is absolute so web, worker and beat agree
# whatever their working directory; the folders are created here.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", "filesystem://localhost/")


def filesystem_broker_options(broker_dir: Path) -> dict:
    """kombu filesystem transport folders under ``broker_dir`` (created here)."""
    broker_dir = broker_dir.resolve()
    for folder in ("out", "processed", "control"):
        (broker_dir / folder).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(broker_dir / "out"),
        "data_folder_out": str(broker_dir / "out"),
        "processed_folder": str(broker_dir / "processed"),
        "control_folder": str(broker_dir / "control"),
        "store_processed": False,
    }


CELERY_BROKER_TRANSPORT_OPTIONS = (
    filesystem_broker_options(Path(env("CELERY_BROKER_DIR", str(BASE_DIR / ".run" / "broker"))))
    if CELERY_BROKER_URL.startswith("filesystem")
    else {}
)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND") or None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- Creditdesk domain settings --------------------------------------------
# Grants above this many credits wait for a second person's approval.
CREDITDESK_GRANT_APPROVAL_THRESHOLD = Decimal(env("CREDITDESK_GRANT_APPROVAL_THRESHOLD", "50000"))
# Usage events older than this (seconds) are refused; newer than now + skew too.
CREDITDESK_USAGE_GRACE_SECONDS = int(env("CREDITDESK_USAGE_GRACE_SECONDS", str(35 * 24 * 3600)))
CREDITDESK_CLOCK_SKEW_SECONDS = int(env("CREDITDESK_CLOCK_SKEW_SECONDS", "300"))
CREDITDESK_DEFAULT_HOLD_TTL_SECONDS = int(env("CREDITDESK_DEFAULT_HOLD_TTL_SECONDS", "900"))
CREDITDESK_MAX_HOLD_TTL_SECONDS = int(env("CREDITDESK_MAX_HOLD_TTL_SECONDS", str(7 * 24 * 3600)))

# Optional per-API-key rate limit, e.g. "6000/minute"; unset: no limit. Counted
# in the default cache (per process unless CACHES points at a shared cache).
CREDITDESK_API_RATE_LIMIT = env("CREDITDESK_API_RATE_LIMIT") or None

# --- Invoices and payments --------------------------------------------------
# Days from issue to due date for customers without a billing profile.
CREDITDESK_INVOICE_NET_TERMS_DAYS = int(env("CREDITDESK_INVOICE_NET_TERMS_DAYS", "30"))
# An activated contract lets its pooled wallet borrow (overdraft) up to its
# committed credits per year × this factor, unless the contract sets a limit.
CREDITDESK_CONTRACT_OVERDRAFT_FACTOR = Decimal(env("CREDITDESK_CONTRACT_OVERDRAFT_FACTOR", "1"))
# The seller named on invoices (HTML and PDF).
CREDITDESK_INVOICE_SELLER = env("CREDITDESK_INVOICE_SELLER", "Creditdesk")
# --- Revenue recognition ----------------------------------------------------
# Money per promotional credit for the promotion cost in the revenue report;
# unset: the smallest active prepaid pack's price ÷ credits in the report's currency.
CREDITDESK_PROMOTION_LIST_PRICE = (
    Decimal(env("CREDITDESK_PROMOTION_LIST_PRICE")) if env("CREDITDESK_PROMOTION_LIST_PRICE") else None
)
# Where the nightly revenue check sends its alert when something does not reconcile.
CREDITDESK_FINANCE_ALERT_EMAIL = env("CREDITDESK_FINANCE_ALERT_EMAIL", "finance@creditdesk.local")
# Standard Webhooks secret ("whsec_<base64>") of the payment provider's webhook;
# unset: POST /api/v1/payments/webhook refuses every call.
PAYMENTS_WEBHOOK_SECRET = env("PAYMENTS_WEBHOOK_SECRET")
# Signed payment webhooks older or newer than this (seconds) are refused (replay guard).
PAYMENTS_WEBHOOK_TOLERANCE_SECONDS = int(env("PAYMENTS_WEBHOOK_TOLERANCE_SECONDS", "300"))

# --- Alerts and notifications ----------------------------------------------
ALERTS_SMS_BACKEND = env("ALERTS_SMS_BACKEND", "console")  # console | twilio
TWILIO_ACCOUNT_SID = env("TWILIO_ACCOUNT_SID")
TWILIO_AUTH_TOKEN = env("TWILIO_AUTH_TOKEN")
TWILIO_FROM_NUMBER = env("TWILIO_FROM_NUMBER")
TWILIO_API_BASE_URL = env("TWILIO_API_BASE_URL", "https://api.twilio.com")
ALERTS_WEBHOOK_TIMEOUT_SECONDS = int(env("ALERTS_WEBHOOK_TIMEOUT_SECONDS", "10"))
ALERTS_MAX_ATTEMPTS = int(env("ALERTS_MAX_ATTEMPTS", "8"))
ALERTS_RETRY_BASE_SECONDS = int(env("ALERTS_RETRY_BASE_SECONDS", "30"))
ALERTS_RETRY_MAX_SECONDS = int(env("ALERTS_RETRY_MAX_SECONDS", "21600"))
ALERTS_WEBHOOK_DISABLE_AFTER = int(env("ALERTS_WEBHOOK_DISABLE_AFTER", "10"))
ALERTS_TOP_UP_URL = env("ALERTS_TOP_UP_URL")
ALERTS_PAUSE_WHEN_DEPLETED = env_bool("ALERTS_PAUSE_WHEN_DEPLETED", True)
# The demo webhook receiver at /alerts/demo-receiver/<endpoint id> (verifies signatures, stores nothing);
# it answers 404 unless this is on or DEBUG is.
ALERTS_DEMO_RECEIVER = env_bool("ALERTS_DEMO_RECEIVER", True)

# --- Logging ----------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "WARNING")},
}
