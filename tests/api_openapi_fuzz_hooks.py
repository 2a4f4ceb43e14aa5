"""schemathesis hooks for fuzzing ruyi's admin API (tests/api_openapi_fuzz.rs).

JSON Schema cannot state a few of the API's rules, so src/api/openapi.json
states them in words, in each operation's description (and the info
description for byte lengths). A generated request that fits the schema but
breaks one of these rules is still sent; when the server refuses it with 400
and the error that rule names, that refusal is correct and not a failure.
Every other failure stands.

The rules, as the document states them:

- bytes: `maxLength` is a limit in bytes of UTF-8 (JSON Schema counts
  characters);
- self: a person channel (`channel_type` 1) is between the viewer and
  `channel_id`, so the two differ (`invalid_channel`); `/message/send`'s
  `subscribers` do not include the sender;
- numbers: with `subscribers`, `client_msg_no` + '/' + each uid fits the
  client_msg_no limit (`invalid_client_msg_no`);
- range: `/channel/messagesync`'s range is not empty (`invalid_range`).

Two failures are schemathesis's view, not the server's fault:

- its "created resource not found" check counts only DELETE requests as
  deleting, so a group created, deleted with `POST /channel/delete` and
  then looked up is reported. The hooks record which groups exist and drop
  that report unless the group was created and not deleted since;
- it does not count 413 as refusing a request that breaks the schema; the
  server answers 413 for a body or a payload over its limit.
"""

import json

import schemathesis

# The field names that hold uids, in request bodies and queries.
UID_FIELDS = ("uid", "login_uid", "from_uid")
UID_LISTS = ("subscribers", "uids")


def _system_uid(case):
    """`api.system_uid`: the one uid `/user/token` refuses."""
    document = case.operation.schema.raw_schema
    token = document["paths"]["/user/token"]["post"]["requestBody"]["content"]["application/json"]
    return token["schema"]["properties"]["uid"]["not"]["enum"][0]


def _limits(case):
    """The byte limits the served document states."""
    document = case.operation.schema.raw_schema
    schemas = document["components"]["schemas"]
    token = document["paths"]["/user/token"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["properties"]["token"]
    return {
        "uid": schemas["Uid"]["maxLength"],
        "group": schemas["GroupId"]["maxLength"],
        "client_msg_no": schemas["ClientMsgNo"]["maxLength"],
        "token": token["maxLength"],
    }


def _fields(case):
    """The request's fields: the JSON body's (or its array), or the query's."""
    if isinstance(case.body, dict):
        return case.body
    if isinstance(case.body, list):
        return {"uids": case.body}
    return case.query or {}


def _too_long(text, limit):
    return isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > limit


def _breaks_bytes(case, fields):
    limits = _limits(case)
    for name in UID_FIELDS:
        if _too_long(fields.get(name), limits["uid"]):
            return True
    for name in UID_LISTS:
        values = fields.get(name)
        if isinstance(values, list) and any(_too_long(v, limits["uid"]) for v in values):
            return True
    person = fields.get("channel_type") == 1
    if _too_long(fields.get("channel_id"), limits["uid"] if person else limits["group"]):
        return True
    if _too_long(fields.get("client_msg_no"), limits["client_msg_no"]):
        return True
    return _too_long(fields.get("token"), limits["token"])


def _viewer(case, path, fields):
    if path == "/message/send":
        return fields.get("from_uid") or _system_uid(case)
    if path in ("/channel/messagesync", "/message/revoke"):
        return fields.get("login_uid")
    return fields.get("uid")


def _breaks_self(case, path, fields):
    viewer = _viewer(case, path, fields)
    if fields.get("channel_type") == 1 and fields.get("channel_id") == viewer:
        return True
    subscribers = fields.get("subscribers")
    return path == "/message/send" and isinstance(subscribers, list) and viewer in subscribers


def _breaks_numbers(case, path, fields):
    number = fields.get("client_msg_no")
    subscribers = fields.get("subscribers")
    if path != "/message/send" or not number or not isinstance(subscribers, list):
        return False
    limit = _limits(case)["client_msg_no"]
    return any(_too_long(f"{number}/{uid}", limit) for uid in subscribers)


def _breaks_range(path, fields):
    if path != "/channel/messagesync":
        return False
    start = fields.get("start_message_seq", 0)
    end = fields.get("end_message_seq", 0)
    if fields.get("pull_mode", 0) == 1:
        return end != 0 and end <= max(start, 1)
    return start != 0 and end >= start


def _broken_rules(case):
    """The errors the server answers for each rule this request breaks."""
    path = case.operation.path
    fields = _fields(case)
    errors = set()
    if _breaks_bytes(case, fields):
        errors.update({"bad_request", "invalid_channel", "invalid_client_msg_no"})
    if _breaks_self(case, path, fields):
        errors.add("invalid_channel")
    if _breaks_numbers(case, path, fields):
        errors.add("invalid_client_msg_no")
    if _breaks_range(path, fields):
        errors.add("invalid_range")
    return errors


# Groups by id: the order of their last successful create and delete.
_events = 0
_created = {}
_deleted = {}


@schemathesis.hook
def after_call(context, case, response):
    global _events
    if response.status_code != 200 or not isinstance(case.body, dict):
        return
    group = case.body.get("channel_id")
    path = case.operation.path
    _events += 1
    if path == "/channel" or (path == "/channel/subscriber_add" and case.body.get("reset") == 1):
        _created[group] = _events
    elif path == "/channel/delete":
        _deleted[group] = _events


def _group_exists(case):
    group = _fields(case).get("channel_id")
    return group in _created and _created[group] > _deleted.get(group, -1)


def _error_name(response):
    try:
        return json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        return None


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep a failure unless a rule stated in the document explains it."""
    kind = type(failure).__name__
    if kind == "RejectedPositiveData" and response.status_code == 400:
        return _error_name(response) not in _broken_rules(case)
    if kind == "EnsureResourceAvailability":
        return _group_exists(case)
    if kind == "AcceptedNegativeData" and response.status_code == 413:
        return _error_name(response) not in ("body_too_large", "payload_too_large")
    return True
