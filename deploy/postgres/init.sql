-- One role and one database per service; each role reaches only its own database.
CREATE ROLE orders LOGIN PASSWORD 'orders';
CREATE ROLE stock LOGIN PASSWORD 'stock';
CREATE DATABASE orders OWNER orders;
CREATE DATABASE stock OWNER stock;
REVOKE ALL ON DATABASE orders FROM PUBLIC;
REVOKE ALL ON DATABASE stock FROM PUBLIC;
