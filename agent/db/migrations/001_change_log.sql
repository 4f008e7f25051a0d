-- 001: the change log. Every invariant of SPEC §1 lives here, inside PostgreSQL,
-- so that every writer (CLI, library, plain SQL from psql) gets it.

CREATE OR REPLACE FUNCTION config_agent_valid_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$' $$;

-- Per-org change counter. Its row lock serializes the writers of one org, so a
-- revision handed out is always greater than every revision committed before it.
CREATE TABLE IF NOT EXISTS config_orgs (
    org_id   text PRIMARY KEY CONSTRAINT config_orgs_org_id_valid CHECK (config_agent_valid_name(org_id)),
    revision bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS service_configs (
    org_id     text NOT NULL CONSTRAINT service_configs_org_id_valid CHECK (config_agent_valid_name(org_id)),
    service    text NOT NULL CONSTRAINT service_configs_service_valid CHECK (config_agent_valid_name(service)),
    key        text NOT NULL CONSTRAINT service_configs_key_valid CHECK (config_agent_valid_name(key)),
    value      jsonb,
    version    bigint NOT NULL DEFAULT 1,
    revision   bigint NOT NULL DEFAULT 0,
    deleted    boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by text NOT NULL DEFAULT session_user,
    PRIMARY KEY (org_id, service, key),
    CONSTRAINT service_configs_value_size CHECK (value IS NULL OR octet_length(value::text) <= 262144),
    CONSTRAINT service_configs_value_present CHECK (deleted OR value IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS service_configs_org_revision ON service_configs (org_id, revision);

CREATE TABLE IF NOT EXISTS config_history (
    id         bigserial PRIMARY KEY,
    org_id     text NOT NULL,
    service    text NOT NULL,
    key        text NOT NULL,
    version    bigint NOT NULL,
    revision   bigint NOT NULL,
    action     text NOT NULL CHECK (action IN ('create', 'update', 'delete', 'rollback')),
    old_value  jsonb,
    new_value  jsonb,
    changed_by text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason     text,
    deleted    boolean NOT NULL DEFAULT false,
    UNIQUE (org_id, revision),
    UNIQUE (org_id, service, key, version)
);
CREATE INDEX IF NOT EXISTS config_history_entry ON config_history (org_id, service, key, version);

-- Hands out the next revision of an org, creating its counter on first use.
-- The UPDATE takes the row lock that serializes writers until COMMIT.
CREATE OR REPLACE FUNCTION config_agent_next_revision(p_org text) RETURNS bigint
LANGUAGE sql
AS $$
    INSERT INTO config_orgs AS o (org_id, revision) VALUES (p_org, 1)
    ON CONFLICT (org_id) DO UPDATE SET revision = o.revision + 1
    RETURNING revision
$$;

-- Who and why, from SET LOCAL config_agent.actor / config_agent.reason.
CREATE OR REPLACE FUNCTION config_agent_actor() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT coalesce(nullif(current_setting('config_agent.actor', true), ''), session_user::text) $$;

-- The lock order of every change is: the entry, then the org counter. A holder of
-- the counter must never wait for an entry, or a writer holding that entry and
-- waiting for the counter deadlocks with it. An INSERT's BEFORE trigger runs before
-- its conflict check, so an entry created by a concurrent transaction is not visible
-- yet when this trigger first looks: a creator therefore takes a per-entry lock and
-- looks again under it. Whoever else creates the same entry holds that lock until
-- COMMIT, so the second look sees it, and this INSERT takes its ON CONFLICT path
-- (entry row lock, then the UPDATE trigger takes the counter) without having taken
-- the counter here.
CREATE OR REPLACE FUNCTION config_agent_entry_exists(p_org text, p_service text, p_key text)
RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT EXISTS (SELECT 1 FROM service_configs
                      WHERE org_id = p_org AND service = p_service AND key = p_key) $$;

CREATE OR REPLACE FUNCTION config_agent_before_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- An existing row means this INSERT will either fail on the primary key or
    -- take its ON CONFLICT path, where the UPDATE trigger numbers the change.
    IF config_agent_entry_exists(NEW.org_id, NEW.service, NEW.key) THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'config_agent.entry:' || NEW.org_id || '/' || NEW.service || '/' || NEW.key, 0));
    IF config_agent_entry_exists(NEW.org_id, NEW.service, NEW.key) THEN
        RETURN NEW;
    END IF;
    IF NEW.deleted THEN
        RAISE EXCEPTION 'cannot create % % % as deleted', NEW.org_id, NEW.service, NEW.key
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := 1;
    NEW.revision := config_agent_next_revision(NEW.org_id);
    NEW.updated_at := clock_timestamp();
    NEW.updated_by := config_agent_actor();
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION config_agent_before_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF (NEW.org_id, NEW.service, NEW.key) IS DISTINCT FROM (OLD.org_id, OLD.service, OLD.key) THEN
        RAISE EXCEPTION 'config entries cannot be renamed; delete and set instead'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.deleted THEN
        NEW.value := NULL;
    END IF;
    -- Nothing really changed: no new version, no history row, no notification.
    IF NEW.deleted = OLD.deleted AND NEW.value IS NOT DISTINCT FROM OLD.value THEN
        RETURN NULL;
    END IF;
    NEW.version := OLD.version + 1;
    NEW.revision := config_agent_next_revision(NEW.org_id);
    NEW.updated_at := clock_timestamp();
    NEW.updated_by := config_agent_actor();
    RETURN NEW;
END
$$;

-- DELETE becomes a tombstone: the row stays with a new version and revision.
CREATE OR REPLACE FUNCTION config_agent_before_delete() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE service_configs SET deleted = true
     WHERE org_id = OLD.org_id AND service = OLD.service AND key = OLD.key AND NOT deleted;
    RETURN NULL;
END
$$;

-- One history row and one notification per change, in the writing transaction:
-- the notification is delivered exactly when (and only if) the change commits.
CREATE OR REPLACE FUNCTION config_agent_after_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_action text;
    v_old jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_action := 'create';
        v_old := NULL;
    ELSE
        v_old := OLD.value;
        IF NEW.deleted THEN
            v_action := 'delete';
        ELSIF OLD.deleted THEN
            v_action := 'create';
        ELSE
            v_action := 'update';
        END IF;
    END IF;
    IF NOT NEW.deleted AND current_setting('config_agent.action', true) = 'rollback' THEN
        v_action := 'rollback';
    END IF;
    INSERT INTO config_history (org_id, service, key, version, revision, action,
                                old_value, new_value, changed_by, changed_at, reason, deleted)
    VALUES (NEW.org_id, NEW.service, NEW.key, NEW.version, NEW.revision, v_action,
            v_old, NEW.value, NEW.updated_by, NEW.updated_at,
            nullif(current_setting('config_agent.reason', true), ''), NEW.deleted);
    PERFORM pg_notify('config_agent_changes', json_build_object(
        'org_id', NEW.org_id, 'service', NEW.service, 'key', NEW.key,
        'version', NEW.version, 'revision', NEW.revision,
        'ts', round(extract(epoch FROM NEW.updated_at)::numeric, 6))::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION config_agent_refuse() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: %', TG_OP, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER IF EXISTS config_agent_before_insert ON service_configs;
CREATE TRIGGER config_agent_before_insert BEFORE INSERT ON service_configs
    FOR EACH ROW EXECUTE FUNCTION config_agent_before_insert();
DROP TRIGGER IF EXISTS config_agent_before_update ON service_configs;
CREATE TRIGGER config_agent_before_update BEFORE UPDATE ON service_configs
    FOR EACH ROW EXECUTE FUNCTION config_agent_before_update();
DROP TRIGGER IF EXISTS config_agent_before_delete ON service_configs;
CREATE TRIGGER config_agent_before_delete BEFORE DELETE ON service_configs
    FOR EACH ROW EXECUTE FUNCTION config_agent_before_delete();
DROP TRIGGER IF EXISTS config_agent_after_change ON service_configs;
CREATE TRIGGER config_agent_after_change AFTER INSERT OR UPDATE ON service_configs
    FOR EACH ROW EXECUTE FUNCTION config_agent_after_change();
DROP TRIGGER IF EXISTS config_agent_no_truncate ON service_configs;
CREATE TRIGGER config_agent_no_truncate BEFORE TRUNCATE ON service_configs
    FOR EACH STATEMENT EXECUTE FUNCTION config_agent_refuse('config entries are deleted as tombstones');

-- The history is append-only, for every role the triggers apply to (the owner included).
DROP TRIGGER IF EXISTS config_agent_history_append_only ON config_history;
CREATE TRIGGER config_agent_history_append_only BEFORE UPDATE OR DELETE ON config_history
    FOR EACH ROW EXECUTE FUNCTION config_agent_refuse('config_history is append-only');
DROP TRIGGER IF EXISTS config_agent_history_no_truncate ON config_history;
CREATE TRIGGER config_agent_history_no_truncate BEFORE TRUNCATE ON config_history
    FOR EACH STATEMENT EXECUTE FUNCTION config_agent_refuse('config_history is append-only');
-- The counters only move through writes to service_configs.
DROP TRIGGER IF EXISTS config_agent_orgs_no_truncate ON config_orgs;
CREATE TRIGGER config_agent_orgs_no_truncate BEFORE TRUNCATE ON config_orgs
    FOR EACH STATEMENT EXECUTE FUNCTION config_agent_refuse('revisions are never reused');
REVOKE UPDATE, DELETE, TRUNCATE ON config_history FROM PUBLIC;

CREATE OR REPLACE FUNCTION config_agent_orgs_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'revision counters are never deleted (revisions are never reused)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.org_id <> OLD.org_id OR NEW.revision <= OLD.revision THEN
        RAISE EXCEPTION 'org revisions only move forward' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS config_agent_orgs_guard ON config_orgs;
CREATE TRIGGER config_agent_orgs_guard BEFORE UPDATE OR DELETE ON config_orgs
    FOR EACH ROW EXECUTE FUNCTION config_agent_orgs_guard();
