"""`saga order` and `saga start`: place an order (from flags or a JSON file, built by devstack.orders), or start a
saga of any type from JSON input, and follow it."""

from __future__ import annotations

import json
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
# StartSaga takes at most this many bytes of JSON input (its contract says so): larger is refused before a call.
_MAX_INPUT_JSON_BYTES = 64 * 1024


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


def _refuse_constant(text: str) -> None:
    raise ValueError(f"{text} is not a JSON number")


def _read_input(source: str, saga_type: str) -> str:
    """The JSON text of --input (a file, or - for stdin), checked to be one JSON object; a usage error otherwise."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {source}: {error.strerror}", param_hint="--input") from None
    where = "stdin" if source == "-" else source
    if len(raw) > _MAX_INPUT_JSON_BYTES:
        raise typer.BadParameter(
            f"{where} holds {len(raw)} bytes; the orchestrator takes at most {_MAX_INPUT_JSON_BYTES} bytes of "
            "JSON input",
            param_hint="--input",
        )
    try:
        # An editor's byte order mark is not part of the JSON.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise typer.BadParameter(f"{where} is not UTF-8 text (byte {error.start})", param_hint="--input") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise typer.BadParameter(f"{where} nests arrays and objects too deeply", param_hint="--input") from None
    except ValueError as error:
        raise typer.BadParameter(f"{where} is not JSON: {error}", param_hint="--input") from None
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a single value"
        raise typer.BadParameter(
            f"{where} holds {kind}; the input of {saga_type} is a JSON object (its input message in the proto3 "
            'JSON mapping, e.g. {"orderId": "ord-1"})',
            param_hint="--input",
        )
    return text


@commands.command(
    "start",
    epilog="The input is the saga type's input message in the proto3 JSON mapping (field names in lowerCamelCase "
    "or as in the proto; int64 values may be strings). It is checked here to be one JSON object, and by the "
    "orchestrator against the input message: an unknown field or a wrong type is refused (exit 4) naming "
    "input_json. Without --key the orchestrator derives the business key from the input, as the definition "
    "declares (OrderSaga: the order id); with --key it must be that key. Starting the same type with the same "
    "key and input again returns the saga started first. "
    "Exits 0 once the saga is started (with --watch: when it completed; 1 when it ended otherwise), 2 for a bad "
    "--input file, 3 when the orchestrator is unreachable, 4 when it refused the start.\n\n"
    "[bold]Examples[/]\n\n"
    "  saga start OrderSaga --input order.json\n\n"
    "  saga start OrderSaga --input order.json --key ord-42 --deadline 600 --watch\n\n"
    '  echo \'{"orderId": "ord-7", "items": [{"sku": "TEE-007", "quantity": 1}]}\' | saga start OrderSaga --input -\n\n'
    "  saga start LoyaltySaga --input points.json --json | jq -r .saga_id",
)
@calls_orchestrator
def start(
    saga_type: Annotated[str, typer.Argument(metavar="TYPE", help="the saga type, e.g. OrderSaga", show_default=False)],
    input_source: Annotated[
        str,
        typer.Option("--input", "-i", metavar="FILE|-", help="the input as JSON ('-' reads stdin)", show_default=False),
    ],
    key: Annotated[
        str, typer.Option("--key", help="the business key (default: derived from the input)", show_default=False)
    ] = "",
    deadline: Annotated[
        int, typer.Option(min=0, help="seconds before the saga is compensated; 0: the definition's or the default")
    ] = 0,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow the saga to its end")] = False,
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Start a saga of any loaded type from JSON input: print its id, and with --watch follow it to its end."""
    from sagactl.client import SagaClient
    from sagactl.render import saga_dict, saga_header, saga_steps, status_name
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    text = _read_input(input_source, saga_type)
    request = pb.StartSagaRequest(saga_type=saga_type, business_key=key, input_json=text, deadline_seconds=deadline)
    console = new_console()
    with SagaClient(config) as client:
        started = client.start_saga(request)
        summary: dict[str, object] = {
            "saga_id": started.saga_id,
            "saga_type": saga_type,
            "definition_version": started.definition_version,
            "business_key": started.business_key,
            "created": started.created,
            "status": status_name(started.status),
        }
        if not as_json:
            from rich.text import Text

            # Text, not markup: the key comes from the input, and brackets in it are not styles.
            line = Text(f"{'started' if started.created else 'already started:'} {saga_type} ")
            line.append(f"v{started.definition_version} for key {started.business_key} → saga ")
            line.append(started.saga_id, style="bold")
            console.print(line, soft_wrap=True)
        if not watch:
            if as_json:
                print_json(summary)
            return
        try:
            saga = _follow(client, started.saga_id, None if as_json else console)
        except KeyboardInterrupt:
            print(f"stopped following; the saga goes on: saga watch {started.saga_id}", file=sys.stderr)
            raise typer.Exit(130) from None
    if as_json:
        print_json({**summary, "status": status_name(saga.status), "saga": saga_dict(saga, history=False)})
    else:
        console.print(saga_header(saga))
        console.print(saga_steps(saga))
    if not ended_well(saga):
        raise typer.Exit(EXIT_FAILED)
