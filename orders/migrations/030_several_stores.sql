-- Several candidate stores per order (API.md §2): `stores` in the shop's order of preference,
-- `split`, and `allocations` (where the lines are held or sold). `store_id` is null for a
-- several-store order. An existing order gets stores = [store_id]; one that holds or sold its
-- lines gets them as allocations in its one store.
ALTER TABLE orders ALTER COLUMN store_id DROP NOT NULL;
ALTER TABLE orders ADD COLUMN stores jsonb;
ALTER TABLE orders ADD COLUMN split boolean NOT NULL DEFAULT false;
ALTER TABLE orders ADD COLUMN allocations jsonb NOT NULL DEFAULT '[]';
UPDATE orders SET stores = jsonb_build_array(store_id);
UPDATE orders o SET allocations = (
    SELECT jsonb_agg(jsonb_build_object('store_id', o.store_id, 'sku', i->>'sku',
                                        'quantity', (i->>'quantity')::int) ORDER BY i->>'sku')
    FROM jsonb_array_elements(o.items) i)
WHERE status IN ('reserved', 'confirming', 'confirmed');
ALTER TABLE orders ALTER COLUMN stores SET NOT NULL;
-- A row written without stores (by code or a tool that predates them) is a one-store order.
-- The WHEN clause keeps the trigger out of the way of every insert that names its stores.
CREATE FUNCTION orders_default_stores() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.stores := jsonb_build_array(NEW.store_id);
    RETURN NEW;
END $$;
CREATE TRIGGER orders_stores_default BEFORE INSERT ON orders
    FOR EACH ROW WHEN (NEW.stores IS NULL) EXECUTE FUNCTION orders_default_stores();
