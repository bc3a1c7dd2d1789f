-- Run once by the postgres container on its first start (mounted into /docker-entrypoint-initdb.d).
-- Every service owns one database under its own role; the orchestrator replicas share `orchestrator`.
-- The passwords are for the local compose stack only: compose.yaml passes the same ones in DATABASE_URL.

CREATE ROLE orchestrator LOGIN PASSWORD 'orchestrator';
CREATE ROLE inventory LOGIN PASSWORD 'inventory';
CREATE ROLE payment LOGIN PASSWORD 'payment';
CREATE ROLE shipping LOGIN PASSWORD 'shipping';
CREATE ROLE notify LOGIN PASSWORD 'notify';

CREATE DATABASE orchestrator OWNER orchestrator;
CREATE DATABASE inventory OWNER inventory;
CREATE DATABASE payment OWNER payment;
CREATE DATABASE shipping OWNER shipping;
CREATE DATABASE notify OWNER notify;

-- A service reaches its own database only.
REVOKE CONNECT ON DATABASE orchestrator, inventory, payment, shipping, notify FROM PUBLIC;
GRANT CONNECT ON DATABASE orchestrator TO orchestrator;
GRANT CONNECT ON DATABASE inventory TO inventory;
GRANT CONNECT ON DATABASE payment TO payment;
GRANT CONNECT ON DATABASE shipping TO shipping;
GRANT CONNECT ON DATABASE notify TO notify;
