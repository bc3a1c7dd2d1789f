"""`saga order`: place an order (from flags or a JSON file, built by devstack.orders) and follow its saga."""

from __future__ import annotations

import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import (
    Json_,
    calls_orchestrator,
    ended_well,
    new_console,
    print_events,
    print_json,
)
from sagactl.settings import EXIT_FAILED, ClientConfig

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from sagactl.client import SagaClient
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["commands"]

commands = typer.Typer()

# What `saga order` orders when neither --item nor --file names anything, and in what currency it pays.
_DEFAULT_ITEM = ("BOOK-001", 1)
_DEFAULT_CURRENCY = "EUR"
_ADDRESS_FIELDS = ("recipient_name", "street", "city", "postal_code", "country_code")


def _parse_item(text: str) -> tuple[str, int]:
    sku, _, quantity = text.partition(":")
    try:
        count = int(quantity) if quantity else 1
    except ValueError:
        count = 0
    if not sku or count < 1:
        raise typer.BadParameter(f"{text!r}: expected SKU or SKU:QUANTITY, e.g. BOOK-001:2", param_hint="--item")
    return sku, count


def _minor_units(amount: str) -> int:
    try:
        value = Decimal(amount) * 100
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value():
        raise typer.BadParameter(f"{amount!r}: expected an amount like 29.99", param_hint="--amount")
    return int(value)


def _read_order_file(path: Path) -> pb.PlaceOrderRequest:
    from google.protobuf import json_format  # only `saga order --file` parses protobuf JSON

    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--file") from None
    request = pb.PlaceOrderRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as error:
        raise typer.BadParameter(f"{path} is not a PlaceOrderRequest in JSON: {error}", param_hint="--file") from None
    return request


def _build_order(
    file: Path | None,
    order_id: str | None,
    items: list[str] | None,
    amount: str | None,
    currency: str | None,
    payment_token: str | None,
    email: str | None,
    shipping: dict[str, str | None],
    deadline: int | None,
) -> pb.PlaceOrderRequest:
    """The file's order (when given) with the flags on top; what neither gives comes from the defaults.

    A flag given as an empty string empties an address field, while the id, currency, token and e-mail fall
    back to their defaults. devstack.orders builds the request, and its defaults are the token and e-mail.
    """
    from devstack.orders import DEMO_ADDRESS, UNIT_PRICE_MINOR, order_request
    from sagasuite.common.v1.common_pb2 import Address
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    base = _read_order_file(file) if file else pb.PlaceOrderRequest()
    lines = [_parse_item(item) for item in items] if items else [(i.sku, i.quantity) for i in base.items]
    lines = lines or [_DEFAULT_ITEM]
    minor_units = _minor_units(amount) if amount is not None else base.amount.minor_units
    address = Address()
    for field in _ADDRESS_FIELDS:
        value = shipping[field]
        setattr(address, field, value if value is not None else getattr(base.shipping_address, field))
        if value is None and not getattr(address, field):
            setattr(address, field, getattr(DEMO_ADDRESS, field))
    given = {
        "token": payment_token if payment_token is not None else base.payment_token,
        "email": email if email is not None else base.customer_email,
    }
    return order_request(
        (order_id if order_id is not None else base.order_id) or f"ord-{uuid.uuid4().hex[:12]}",
        items=lines,
        minor_units=minor_units or UNIT_PRICE_MINOR * sum(quantity for _, quantity in lines),
        currency=(currency.upper() if currency is not None else base.amount.currency_code) or _DEFAULT_CURRENCY,
        address=address,
        deadline_seconds=deadline if deadline is not None else base.deadline_seconds,
        **{name: value for name, value in given.items() if value},
    )


def _progress(saga: pb.Saga, started: float) -> RenderableType:
    from rich.console import Group
    from rich.spinner import Spinner
    from rich.text import Text

    from sagactl.render import STATUS_STYLE, saga_steps, status_name

    status = status_name(saga.status)
    line = Text()
    line.append(f"saga {saga.saga_id}  order {saga.business_key}  ")
    line.append(status, style=STATUS_STYLE.get(status, "bold"))
    line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
    if saga.current_step and not saga.HasField("ended_at"):
        line.append(f"  at {saga.current_step}", style="cyan")
    return Group(Spinner("dots", text=line), saga_steps(saga))


def _follow(client: SagaClient, saga_id: str, console: Console | None) -> pb.Saga:
    """Follow the saga until it ends or needs attention (events, or a live step table in a terminal)."""
    saga = client.get_saga(saga_id)
    if console is None:
        for _ in client.watch(saga_id):
            pass
    elif console.is_terminal:
        from rich.live import Live

        started = time.monotonic()
        with Live(_progress(saga, started), console=console, refresh_per_second=10, transient=True) as live:
            for _ in client.watch(saga_id):
                saga = client.get_saga(saga_id)
                live.update(_progress(saga, started))
    else:
        print_events(client, saga, 0, console, as_json=False)
    return client.get_saga(saga_id)


@commands.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga order\n\n"
    "  saga order --order-id ord-42 --item BOOK-001:2 --item MUG-042 --amount 59.98 --currency EUR\n\n"
    "  saga order --payment-token tok_declined          (compensated: exits 1)\n\n"
    "  saga order --file order.json --no-wait --json\n\n"
    '  echo \'{"orderId": "ord-7", "items": [{"sku": "TEE-007", "quantity": 1}]}\' | saga order --file -'
)
@calls_orchestrator
def order(
    order_id: Annotated[
        str | None, typer.Option(help="order id, the saga's business key", show_default="a new ord-<hex>")
    ] = None,
    item: Annotated[
        list[str] | None,
        typer.Option("--item", "-i", help="SKU or SKU:QUANTITY; repeatable", show_default="BOOK-001:1"),
    ] = None,
    amount: Annotated[
        str | None, typer.Option(help="amount to charge, e.g. 29.99", show_default="29.99 per unit")
    ] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217 currency", show_default="EUR")] = None,
    payment_token: Annotated[
        str | None,
        typer.Option(help="tok_declined and tok_insufficient_funds are refused", show_default="tok_visa"),
    ] = None,
    email: Annotated[str | None, typer.Option(help="customer e-mail", show_default="ada@example.com")] = None,
    name: Annotated[str | None, typer.Option(help="recipient name", show_default="Ada Lovelace")] = None,
    street: Annotated[str | None, typer.Option(help="street", show_default="12 St James's Square")] = None,
    city: Annotated[str | None, typer.Option(help="city", show_default="London")] = None,
    postal_code: Annotated[str | None, typer.Option(help="postal code", show_default="SW1Y 4JH")] = None,
    country: Annotated[str | None, typer.Option(help="ISO 3166 country code", show_default="GB")] = None,
    deadline: Annotated[
        int | None, typer.Option(min=0, help="seconds before the saga is compensated; 0: server default")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="PlaceOrderRequest as JSON ('-' reads stdin); flags override it", show_default=False
        ),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the saga id and return at once")] = False,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Place an order: print the saga id, then follow the saga to its end.

    Exits 0 when the saga completed, 1 when it ended otherwise (compensated, needs attention,
    terminated), 4 when the order is refused (invalid, or the order id is taken by a different order).
    """
    from sagactl.client import SagaClient
    from sagactl.render import saga_dict, saga_header, saga_steps, status_name

    shipping = dict(zip(_ADDRESS_FIELDS, (name, street, city, postal_code, country), strict=True))
    request = _build_order(file, order_id, item, amount, currency, payment_token, email, shipping, deadline)
    console = new_console()
    with SagaClient(config) as client:
        placed = client.place_order(request)
        summary: dict[str, object] = {
            "saga_id": placed.saga_id,
            "order_id": request.order_id,
            "created": placed.created,
            "status": status_name(placed.status),
        }
        if not as_json:
            verb = "placed order" if placed.created else "order already placed:"
            console.print(f"{verb} {request.order_id} → saga [bold]{placed.saga_id}[/]")
        if no_wait:
            if as_json:
                print_json(summary)
            return
        try:
            saga = _follow(client, placed.saga_id, None if as_json else console)
        except KeyboardInterrupt:
            print(f"stopped following; the saga goes on: saga watch {placed.saga_id}", file=sys.stderr)
            raise typer.Exit(130) from None
    if as_json:
        print_json({**summary, "status": status_name(saga.status), "saga": saga_dict(saga, history=False)})
    else:
        console.print(saga_header(saga))
        console.print(saga_steps(saga))
    if not ended_well(saga):
        raise typer.Exit(EXIT_FAILED)
