-- 003: the tenant read policies without a function call (issue #21).
-- 002's policies called config_agent_reader_org(), a SECURITY DEFINER PL/pgSQL
-- function, once per table a query reads: every delta read paid two such calls, about
-- 50 µs of backend CPU when a change wakes a fleet's backends at once (a third of the
-- read). The same mapping through a view is planned inline, as one index lookup.
--
-- The view runs with its owner's rights on config_reader_roles (readers still may not
-- read that table) and shows the calling role its own row only: `current_user` in a
-- view is the role running the query, never the view's owner.
CREATE OR REPLACE VIEW config_agent_my_org WITH (security_barrier) AS
    SELECT org_id FROM config_reader_roles WHERE role_name = current_user::text;
REVOKE ALL ON config_agent_my_org FROM PUBLIC;
GRANT SELECT ON config_agent_my_org TO config_agent_reader;

DROP POLICY IF EXISTS config_agent_tenant_read ON service_configs;
CREATE POLICY config_agent_tenant_read ON service_configs FOR SELECT TO config_agent_reader
    USING (org_id = (SELECT org_id FROM config_agent_my_org));
DROP POLICY IF EXISTS config_agent_tenant_read ON config_history;
CREATE POLICY config_agent_tenant_read ON config_history FOR SELECT TO config_agent_reader
    USING (org_id = (SELECT org_id FROM config_agent_my_org));
DROP POLICY IF EXISTS config_agent_tenant_read ON config_orgs;
CREATE POLICY config_agent_tenant_read ON config_orgs FOR SELECT TO config_agent_reader
    USING (org_id = (SELECT org_id FROM config_agent_my_org));
