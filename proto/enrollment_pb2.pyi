from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "hospital", "node_public_key", "identity_public_key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    NODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    hospital: str
    node_public_key: bytes
    identity_public_key: bytes
    def __init__(self, token: _Optional[str] = ..., hospital: _Optional[str] = ..., node_public_key: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("hospital", "identity_public_key")
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    hospital: str
    identity_public_key: bytes
    def __init__(self, hospital: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("federation", "fleet_port", "node_id", "members")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    FLEET_PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    federation: str
    fleet_port: int
    node_id: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, federation: _Optional[str] = ..., fleet_port: _Optional[int] = ..., node_id: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ("hospital", "unix_time", "signature")
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    hospital: str
    unix_time: int
    signature: bytes
    def __init__(self, hospital: _Optional[str] = ..., unix_time: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class MembersReply(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...
