import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sagasuite.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShipmentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHIPMENT_STATUS_UNSPECIFIED: _ClassVar[ShipmentStatus]
    SHIPMENT_STATUS_CREATED: _ClassVar[ShipmentStatus]
    SHIPMENT_STATUS_CANCELLED: _ClassVar[ShipmentStatus]
    SHIPMENT_STATUS_TOMBSTONE: _ClassVar[ShipmentStatus]
SHIPMENT_STATUS_UNSPECIFIED: ShipmentStatus
SHIPMENT_STATUS_CREATED: ShipmentStatus
SHIPMENT_STATUS_CANCELLED: ShipmentStatus
SHIPMENT_STATUS_TOMBSTONE: ShipmentStatus

class Shipment(_message.Message):
    __slots__ = ("shipment_id", "order_id", "status", "tracking_number", "address", "items", "created_at")
    SHIPMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRACKING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    shipment_id: str
    order_id: str
    status: ShipmentStatus
    tracking_number: str
    address: _common_pb2.Address
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.LineItem]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, shipment_id: _Optional[str] = ..., order_id: _Optional[str] = ..., status: _Optional[_Union[ShipmentStatus, str]] = ..., tracking_number: _Optional[str] = ..., address: _Optional[_Union[_common_pb2.Address, _Mapping]] = ..., items: _Optional[_Iterable[_Union[_common_pb2.LineItem, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateShipmentRequest(_message.Message):
    __slots__ = ("order_id", "address", "items")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    address: _common_pb2.Address
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.LineItem]
    def __init__(self, order_id: _Optional[str] = ..., address: _Optional[_Union[_common_pb2.Address, _Mapping]] = ..., items: _Optional[_Iterable[_Union[_common_pb2.LineItem, _Mapping]]] = ...) -> None: ...

class CreateShipmentResponse(_message.Message):
    __slots__ = ("shipment",)
    SHIPMENT_FIELD_NUMBER: _ClassVar[int]
    shipment: Shipment
    def __init__(self, shipment: _Optional[_Union[Shipment, _Mapping]] = ...) -> None: ...

class CancelShipmentRequest(_message.Message):
    __slots__ = ("order_id", "reason")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    reason: str
    def __init__(self, order_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelShipmentResponse(_message.Message):
    __slots__ = ("shipment", "was_created")
    SHIPMENT_FIELD_NUMBER: _ClassVar[int]
    WAS_CREATED_FIELD_NUMBER: _ClassVar[int]
    shipment: Shipment
    was_created: bool
    def __init__(self, shipment: _Optional[_Union[Shipment, _Mapping]] = ..., was_created: bool = ...) -> None: ...

class GetShipmentRequest(_message.Message):
    __slots__ = ("order_id",)
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    def __init__(self, order_id: _Optional[str] = ...) -> None: ...

class GetShipmentResponse(_message.Message):
    __slots__ = ("shipment",)
    SHIPMENT_FIELD_NUMBER: _ClassVar[int]
    shipment: Shipment
    def __init__(self, shipment: _Optional[_Union[Shipment, _Mapping]] = ...) -> None: ...
