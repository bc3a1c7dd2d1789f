"""Message types for YAML sagas: descriptor sets or server reflection, one pool per contract, and its hash."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

__all__ = ["Contract", "ContractError", "contract_from_files", "read_descriptor_set", "reflect_descriptor_set"]

# Well-known types are read as JSON values, not walked field by field.
_OPAQUE_MESSAGES = frozenset(
    {
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Any",
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    }
)
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


class ContractError(ValueError):
    """A descriptor set that cannot be read, or a type or method the contract does not have."""


def read_descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    """A FileDescriptorSet from a file made by `buf build -o x.binpb` or `protoc --descriptor_set_out`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ContractError(f"cannot read the descriptor set {path}: {error.strerror}") from None
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(data)
    except DecodeError:
        raise ContractError(
            f"{path} is not a descriptor set: make one with `buf build -o {path.name}` "
            "or `protoc --include_imports --descriptor_set_out`"
        ) from None
    if not files.file:
        raise ContractError(f"{path} holds no proto file")
    return files


def reflect_descriptor_set(
    address: str, services: Iterable[str], timeout: float = 5.0
) -> descriptor_pb2.FileDescriptorSet:
    """The files defining services (and their imports), asked of a server over gRPC server reflection."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for service in services:
            try:
                found = pool.FindServiceByName(service)
            except KeyError:
                raise ContractError(f"the server at {address} does not offer {service} over reflection") from None
            _collect(found.file, files)
        return descriptor_pb2.FileDescriptorSet(file=list(files.values()))
    except grpc.FutureTimeoutError:
        raise ContractError(f"no answer from {address} for server reflection within {timeout:g} s") from None
    except grpc.RpcError as error:
        raise ContractError(f"server reflection at {address} failed: {error.code().name}") from None
    finally:
        channel.close()


def _collect(file: object, into: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    name = file.name  # type: ignore[attr-defined]
    if name in into:
        return
    for dependency in file.dependencies:  # type: ignore[attr-defined]
        _collect(dependency, into)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)  # type: ignore[attr-defined]
    into[name] = proto


def _canonical(file: descriptor_pb2.FileDescriptorProto) -> bytes:
    # Comments and positions differ between buf and protoc for one contract; they are not the contract.
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    copy.ClearField("source_code_info")
    return copy.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Contract:
    """One pool of message types and services, and the hash of the files it was built from."""

    pool: descriptor_pool.DescriptorPool
    hash: str
    services: tuple[str, ...] = ()

    def message_class(self, full_name: str) -> type[Message]:
        try:
            return GetMessageClass(self.pool.FindMessageTypeByName(full_name))
        except KeyError:
            raise ContractError(f"the contract has no message type {full_name}") from None

    def service(self, full_name: str) -> ServiceDescriptor:
        try:
            return self.pool.FindServiceByName(full_name)
        except KeyError:
            known = ", ".join(sorted(self.service_names())) or "none"
            raise ContractError(f"the contract has no service {full_name} (it has: {known})") from None

    def method(self, service: str, method: str) -> MethodDescriptor:
        found = self.service(service)
        descriptor = found.methods_by_name.get(method)
        if descriptor is None:
            known = ", ".join(sorted(found.methods_by_name))
            raise ContractError(f"service {service} has no method {method} (it has: {known})")
        if descriptor.client_streaming or descriptor.server_streaming:
            raise ContractError(f"{service}/{method} is a streaming method; a saga step calls unary methods")
        return descriptor

    def service_names(self) -> list[str]:
        return list(self.services)


def contract_from_files(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Contract:
    """A Contract over files; the generated suite classes are reused when the files are the suite's own."""
    by_name: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for file in files:
        earlier = by_name.get(file.name)
        if earlier is not None and _canonical(earlier) != _canonical(file):
            raise ContractError(f"two different versions of {file.name} in the descriptor sets")
        by_name[file.name] = file
    digest = hashlib.sha256()
    for name in sorted(by_name):
        digest.update(name.encode() + b"\0" + hashlib.sha256(_canonical(by_name[name])).digest())
    default = descriptor_pool.Default()
    pool = default if all(_same_in(default, file) for file in by_name.values()) else _private_pool(by_name)
    services = tuple(
        f"{file.package}.{service.name}" if file.package else service.name
        for file in by_name.values()
        for service in file.service
    )
    return Contract(pool, digest.hexdigest(), services)


def _same_in(pool: descriptor_pool.DescriptorPool, file: descriptor_pb2.FileDescriptorProto) -> bool:
    if file.name.startswith("sagasuite/") and file.name.endswith(".proto"):
        # The suite's generated module registers its file in the default pool when imported.
        with contextlib.suppress(ImportError):
            importlib.import_module(file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
    try:
        existing = pool.FindFileByName(file.name)
    except KeyError:
        return False
    proto = descriptor_pb2.FileDescriptorProto()
    existing.CopyToProto(proto)
    return _canonical(_without_json_names(proto)) == _canonical(_without_json_names(file))


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    # protoc fills json_name in descriptor sets; CopyToProto of a loaded file does not.
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)

    def strip(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(copy.message_type)
    return copy


def _private_pool(by_name: dict[str, descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in added:
            return
        file = by_name.get(name)
        if file is None:
            raise ContractError(
                f"{chain[-1]} imports {name}, which the descriptor set does not hold: build it with "
                "`buf build -o` or `protoc --include_imports`"
            )
        for dependency in file.dependency:
            add(dependency, (*chain, name))
        try:
            pool.Add(file)
        except (TypeError, ValueError) as error:
            raise ContractError(f"{name} cannot be loaded: {error}") from None
        added.add(name)

    for name in sorted(by_name):
        add(name, (name,))
    return pool


# -- reading messages as jq sees them ---------------------------------------------------------


def field_names(descriptor: Any) -> dict[str, Any]:
    """A message's fields by proto name and by JSON name, as json_format accepts both."""
    names: dict[str, Any] = {}
    for field in descriptor.fields:
        names[field.name] = field
        names[field.json_name] = field
    return names


def is_opaque(descriptor: Any) -> bool:
    return descriptor.full_name in _OPAQUE_MESSAGES or descriptor.GetOptions().map_entry


def check_path(descriptor: Any, path: list[str]) -> str | None:
    """Why a path of field names does not exist in a message type, or None when it may."""
    current: Any = descriptor
    walked = descriptor.full_name
    for name in path:
        if current is None:
            return f"{walked} is not a message, so it has no field {name!r}"
        if is_opaque(current):
            return None
        field = field_names(current).get(name)
        if field is None:
            known = ", ".join(f.name for f in current.fields)
            return f"{current.full_name} has no field {name!r} (it has: {known})"
        if field.is_repeated:
            return None  # an index or an iteration follows, which is not a field path
        current = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        walked = f"{walked}.{name}"
    return None


MessageReader = Callable[[Message], object]


def to_jq(message: Message) -> dict[str, object]:
    """A message as the JSON object expressions read: proto field names, 64-bit integers as numbers,
    scalars with their defaults present, so `.amount.minor_units >= 100000` compares numbers."""
    return _message_value(message)


def _message_value(message: Message) -> dict[str, object]:
    from google.protobuf import json_format

    descriptor = message.DESCRIPTOR
    if is_opaque(descriptor):
        opaque: dict[str, object] = json_format.MessageToDict(message, preserving_proto_field_name=True)
        return opaque
    out: dict[str, object] = {}
    for field in descriptor.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
                out[field.name] = as_dict.get(field.name, {})
            else:
                out[field.name] = [_field_value(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = _message_value(value)
        elif field.has_presence and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field: Any, value: object) -> object:
    import base64

    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message_value(value)  # type: ignore[arg-type]
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None and isinstance(value, int)
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()  # type: ignore[arg-type]
    if field.type in _INT64_TYPES:
        return int(value)  # type: ignore[call-overload]
    return value


def sample(descriptor: Any, depth: int = 0) -> dict[str, object]:
    """A JSON object with every field of a message type set to a sample value, for load-time dry runs."""
    out: dict[str, object] = {}
    for field in descriptor.fields:
        value = _sample_value(field, depth)
        if value is _SKIP:
            continue
        out[field.name] = [value] if field.is_repeated else value
    return out


_SKIP = object()


def _sample_value(field: Any, depth: int) -> object:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message_type = field.message_type
        assert message_type is not None
        if message_type.GetOptions().map_entry or is_opaque(message_type) or depth > 6:
            return _SKIP
        return sample(message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        values = field.enum_type.values
        return values[-1].name if values else _SKIP
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"sample-{field.name}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "c2FtcGxl"
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    return 1
