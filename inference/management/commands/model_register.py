from django.core.management.base import BaseCommand

from inference.services import backend_add, served_model_upsert


class Command(BaseCommand):
    help = "Create or update a served model and add SGLang backends to its pool."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the model name customers use")
        parser.add_argument("--backend", action="append", default=[], help="backend base URL (repeatable)")
        parser.add_argument("--upstream-name", default="", help="the backends' --served-model-name")
        parser.add_argument("--context-length", type=int, default=8192)
        parser.add_argument("--backend-api-key", default="")

    def handle(self, *args, name, backend, upstream_name, context_length, backend_api_key, **options):
        model = served_model_upsert(name=name, upstream_name=upstream_name, context_length=context_length)
        for url in backend:
            backend_add(model=model, url=url, api_key=backend_api_key)
        urls = ", ".join(b.url for b in model.backends.all()) or "no backends"
        self.stdout.write(f"model {model.name}: {urls}")
