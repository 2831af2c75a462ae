from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.models import Membership
from tenants.selectors import tenant_get_by_slug
from tenants.services import membership_create, user_create


class Command(BaseCommand):
    help = "Create a user, optionally as a member of a tenant."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", default=None)
        parser.add_argument("--tenant", help="slug of the tenant to join")
        parser.add_argument("--role", choices=Membership.Role.values, default=Membership.Role.MEMBER)

    def handle(self, *args, username, email, password, tenant, role, **options):
        tenant_row = None
        if tenant:
            tenant_row = tenant_get_by_slug(slug=tenant)
            if tenant_row is None:
                raise CommandError(f"no tenant with slug {tenant!r}")
        try:
            user = user_create(username=username, email=email, password=password)
            if tenant_row:
                membership_create(tenant=tenant_row, user=user, role=role)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from error
        joined = f" {role} of {tenant_row.slug}" if tenant_row else ""
        self.stdout.write(f"user {user.username}{joined}")
