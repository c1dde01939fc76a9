-- Run once by the postgres image when its volume is new (docker-entrypoint-initdb.d),
-- as POSTGRES_USER (worldline) in POSTGRES_DB (worldline).
-- The query API connects as worldline_reader: it may read, never write.
CREATE ROLE worldline_reader LOGIN PASSWORD 'worldline_reader';
ALTER ROLE worldline_reader SET default_transaction_read_only = on;
-- Whatever worldline creates (one schema per projector) is readable by the reader.
ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT USAGE ON SCHEMAS TO worldline_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT SELECT ON TABLES TO worldline_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT SELECT ON SEQUENCES TO worldline_reader;
