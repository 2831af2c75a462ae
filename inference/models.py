"""The model registry: served model names and the pools of SGLang backends behind them."""
from django.db import models

from tenants.models import TimeStampedModel


class ServedModel(TimeStampedModel):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        DISABLED = "disabled", "Disabled"

    # The name customers put in `model`.
    name = models.CharField(max_length=200, unique=True)
    # The name the backends serve it under (their --served-model-name); empty = `name`.
    upstream_name = models.CharField(max_length=200, blank=True, default="")
    # Tokens of prompt plus completion; the backends enforce it, this is for display.
    context_length = models.PositiveIntegerField(default=8192)
    owned_by = models.CharField(max_length=100, default="platform")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)

    class RoutingPolicy(models.TextChoices):
        CACHE_AWARE = "cache_aware", "Cache-aware (longest cached prefix, load-balanced)"
        LEAST_OUTSTANDING = "least_outstanding", "Least outstanding requests"
        ROUND_ROBIN = "round_robin", "Round robin"

    routing_policy = models.CharField(max_length=32, choices=RoutingPolicy.choices,
                                      default=RoutingPolicy.CACHE_AWARE)
    # The backends schedule by request priority (SGLang's --enable-priority-scheduling):
    # each request carries its tenant tier's GATEWAY_TIER_BACKEND_PRIORITY.
    backend_priority = models.BooleanField(
        default=False, help_text="Backends run with --enable-priority-scheduling: send each request its "
                                 "tenant tier's priority, so premium goes first in their queues.")
    # Prices in `currency` per million tokens, used for budgets. (The billing price
    # book, effective-dated per model version, is what invoices use.)
    currency = models.CharField(max_length=3, default="usd")
    input_price_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    cached_input_price_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    output_price_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def backend_model_name(self) -> str:
        return self.upstream_name or self.name


class Backend(TimeStampedModel):
    """One SGLang server in a model's pool."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        # Takes no new requests; in-flight ones finish.
        DRAINING = "draining", "Draining"
        DISABLED = "disabled", "Disabled"

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="backends")
    # Base URL without a trailing slash, e.g. http://10.0.0.5:30000
    url = models.CharField(max_length=300)
    # The server's --api-key, if it has one.
    api_key = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)

    class Meta:
        ordering = ["model", "url"]
        constraints = [
            models.UniqueConstraint(fields=["model", "url"], name="backend_unique_model_url"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} @ {self.url}"
