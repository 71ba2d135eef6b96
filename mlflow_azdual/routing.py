"""Routing tables: which store methods are read from the primary or written to the primary only.

Every public method of MLflow's stores, in every supported version, is named in exactly one
table here or implemented by hand in the dual store. ``tests/test_routing.py`` lists the
methods of the installed MLflow and fails on any that is in neither, so a method added by a new
MLflow release never silently falls through to the base class's ``None`` stub.
"""

# Reads: sent to the primary only, which is the source of truth. Results are returned as is.
TRACKING_READS = frozenset(
    """
    batch_get_trace_infos batch_get_traces calculate_trace_filter_correlation
    filter_active_experiment_ids find_completed_sessions get_active_online_scorers get_assessment
    get_budget_policy get_dataset get_dataset_experiment_ids get_gateway_endpoint
    get_gateway_guardrail get_gateway_model_definition get_issue get_label_schema
    get_label_schema_by_name get_latest_mcp_server_version get_mcp_access_endpoint get_mcp_server
    get_mcp_server_version get_mcp_server_version_by_alias get_mcp_server_versions_for_trace
    get_metric_history get_metric_history_bulk_interval
    get_metric_history_bulk_interval_from_steps get_online_scoring_configs
    get_online_trace_details get_review_queue get_review_queue_by_name get_scorer get_secret_info
    get_trace get_trace_info list_budget_policies list_endpoint_bindings
    list_endpoint_guardrail_configs list_gateway_endpoints list_gateway_guardrails
    list_gateway_model_definitions list_label_schemas list_review_queue_items list_review_queues
    list_scorer_versions list_scorers list_scorers_across_experiments list_secret_infos
    query_trace_metrics resolve_trace_archival_config search_datasets search_issues
    search_mcp_access_endpoints search_mcp_server_versions
    search_mcp_servers search_traces sum_gateway_trace_cost search_trace_infos
    get_trace_tag _search_traces list_logged_model_artifacts
    """.split()
)

# Writes of GenAI, tracing and gateway features, which Azure ML's MLflow endpoint does not
# serve: sent to the primary only, and recorded (a WARNING once per method) as not mirrored.
TRACKING_PRIMARY_ONLY_WRITES = frozenset(
    """
    add_dataset_to_experiments add_guardrail_to_endpoint add_items_to_review_queue
    archive_traces attach_model_to_endpoint create_assessment create_budget_policy
    create_dataset create_endpoint_binding create_gateway_endpoint create_gateway_guardrail
    create_gateway_model_definition create_gateway_secret create_issue create_label_schema
    create_mcp_access_endpoint create_mcp_server create_mcp_server_version create_review_queue
    delete_assessment delete_budget_policy delete_dataset delete_dataset_records
    delete_dataset_tag delete_endpoint_binding delete_gateway_endpoint
    delete_gateway_endpoint_tag delete_gateway_guardrail delete_gateway_model_definition
    delete_gateway_secret delete_label_schema delete_mcp_access_endpoint delete_mcp_server
    delete_mcp_server_alias delete_mcp_server_tag delete_mcp_server_version
    delete_mcp_server_version_tag delete_review_queue delete_scorer delete_trace_tag
    delete_traces deprecated_end_trace_v2 deprecated_start_trace_v2 detach_model_from_endpoint
    get_or_create_user_queue link_mcp_server_versions_to_trace link_prompts_to_trace
    link_traces_to_run log_spans log_spans_async register_scorer
    remove_dataset_from_experiments remove_guardrail_from_endpoint
    remove_items_from_review_queue set_dataset_tags set_gateway_endpoint_tag
    set_mcp_server_alias set_mcp_server_tag set_mcp_server_version_tag set_model_versions_tags
    set_review_queue_item_status set_trace_tag start_trace start_trace_v3 end_trace
    unlink_traces_from_run
    update_assessment update_budget_policy update_endpoint_guardrail_config
    update_gateway_endpoint update_gateway_model_definition update_gateway_secret update_issue
    update_label_schema update_mcp_access_endpoint update_mcp_server update_mcp_server_version
    update_review_queue upsert_dataset_records upsert_online_scoring_config
    """.split()
)

# Methods whose AbstractStore implementation is correct for the dual store, because it only
# calls other store methods (log_batch and the async queue that MLflow creates in __init__).
TRACKING_INHERITED = frozenset(
    """
    log_metric_async log_param_async set_tag_async log_batch_async
    end_async_logging flush_async_logging shut_down_async_logging
    """.split()
)

REGISTRY_READS = frozenset(
    """
    get_latest_versions get_model_version get_model_version_by_alias
    get_registered_model search_model_versions
    search_registered_models get_prompt get_prompt_version get_prompt_version_by_alias
    search_prompt_versions search_prompts get_webhook list_webhooks list_webhooks_by_event
    test_webhook
    """.split()
)

# Prompts and webhooks: Azure ML has no prompt registry and its webhooks differ.
REGISTRY_PRIMARY_ONLY_WRITES = frozenset(
    """
    create_prompt create_prompt_version delete_prompt delete_prompt_alias delete_prompt_tag
    delete_prompt_version delete_prompt_version_tag link_prompt_version_to_model
    link_prompt_version_to_run link_prompts_to_trace set_prompt_alias set_prompt_tag
    set_prompt_version_tag create_webhook delete_webhook update_webhook
    """.split()
)


def delegate_to_primary(name):
    """Return a store method that calls ``name`` on the primary store."""

    def method(self, *args, **kwargs):
        return getattr(self.primary, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Call ``{name}`` on the primary store (not mirrored: a read)."
    return method


def primary_only_write(name):
    """Return a store method that writes ``name`` to the primary and records it as not mirrored."""

    def method(self, *args, **kwargs):
        result = getattr(self.primary, name)(*args, **kwargs)
        self.mirror.record_unsupported(name, "the secondary does not serve this feature")
        return result

    method.__name__ = name
    method.__doc__ = f"Call ``{name}`` on the primary store; the secondary does not serve it."
    return method


def install_routes(cls, reads, primary_only_writes):
    """Add a generated method to ``cls`` for each name it does not define itself."""
    for name in reads:
        if name not in cls.__dict__:
            setattr(cls, name, delegate_to_primary(name))
    for name in primary_only_writes:
        if name not in cls.__dict__:
            setattr(cls, name, primary_only_write(name))
