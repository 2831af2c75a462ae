import argparse

from django.core.management.base import BaseCommand

from inference.models import ServedModel
from inference.services import backend_add, served_model_upsert


class Command(BaseCommand):
    help = "Create or update a served model and add SGLang backends to its pool."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the model name customers use")
        parser.add_argument("--backend", action="append", default=[], help="backend base URL (repeatable)")
        parser.add_argument("--upstream-name", default="", help="the backends' --served-model-name")
        parser.add_argument("--context-length", type=int, default=8192)
        parser.add_argument("--backend-api-key", default="")
        parser.add_argument("--routing-policy", choices=ServedModel.RoutingPolicy.values, default=None,
                            help="how the pool picks a backend (unchanged if not given)")
        parser.add_argument("--backend-priority", action=argparse.BooleanOptionalAction, default=None,
                            help="the backends run with --enable-priority-scheduling: requests carry "
                                 "their tenant tier's priority (unchanged if not given)")

    def handle(self, *args, name, backend, upstream_name, context_length, backend_api_key, routing_policy,
               backend_priority, **options):
        model = served_model_upsert(name=name, upstream_name=upstream_name, context_length=context_length,
                                    routing_policy=routing_policy, backend_priority=backend_priority)
        for url in backend:
            backend_add(model=model, url=url, api_key=backend_api_key)
        urls = ", ".join(b.url for b in model.backends.all()) or "no backends"
        self.stdout.write(f"model {model.name}: {urls}")
