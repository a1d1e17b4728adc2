"""Custom search attributes: how the Temporal Web UI and the list endpoints find function versions."""

from temporalio.common import SearchAttributeKey

ACCOUNT = SearchAttributeKey.for_keyword("GpufnAccount")
FUNCTION_ID = SearchAttributeKey.for_keyword("GpufnFunctionId")
FUNCTION_NAME = SearchAttributeKey.for_keyword("GpufnFunctionName")
VERSION_ID = SearchAttributeKey.for_keyword("GpufnVersionId")
STATUS = SearchAttributeKey.for_keyword("GpufnStatus")
ROUTES_UPDATED_AT = SearchAttributeKey.for_datetime("GpufnRoutesUpdatedAt")
"""When the version's routing (status, instances, concurrency) last changed; gateways poll by it."""

ALL = (ACCOUNT, FUNCTION_ID, FUNCTION_NAME, VERSION_ID, STATUS, ROUTES_UPDATED_AT)
